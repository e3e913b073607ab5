"""minirlhf: reward modelling and online iterative DPO (Dong et al. 2024), from scratch in PyTorch."""
