"""Datasets: preparation (digits, ImageFolder, ImageNet), the image folder, transforms, loaders."""
