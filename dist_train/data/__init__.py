"""Data: shard writers (Fashion-MNIST, ImageNet), the streaming WebDataset reader, JPEG decoding."""
