"""Data: discovering samples, decoding images, caching, loaders, audit and the synthetic set."""
