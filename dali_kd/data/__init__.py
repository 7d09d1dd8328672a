"""Data: the image index, the two backends (DALI and torchvision) and the batch they both yield."""
