"""COCO data: annotation files, the detection dataset (decode, resize, flip), samplers that shard
aspect-grouped batches over ranks, the DataLoaders, and the embedded synthetic dataset."""
