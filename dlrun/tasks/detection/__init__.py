"""Object detection (YOLO, Faster R-CNN): the trainer with mAP and drawn boxes, anchor fitting
(k-means), the detection losses and the mean-average-precision metric."""
