"""Images in, tensors out: finding the images of a split (class folders, list files), decoding them,
the transforms of a PreprocessSpec (torch and numpy), datasets, samplers and loaders, augmentation
and the in-memory image cache; splits streamed from URLs of tar shards (stream, stream_loader).
"""
