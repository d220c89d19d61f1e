"""Neural style transfer: the trainer that optimises an image, VGG features and the content /
style (Gram) losses."""
