"""Datasets: TwoMoons, scikit-learn digits, and readers for the standard files of CIFAR-10, SVHN and ImageNet."""
