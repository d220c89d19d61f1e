"""Image classification (MLP ... EfficientNet, timm, RNNs on sequences): the trainer with its eval,
predict and export modes, cross-entropy and hinge losses, the per-class report (confusion matrix,
PR curves, worst examples), ONNX / safetensors export, and the k-NN baseline trainer."""
