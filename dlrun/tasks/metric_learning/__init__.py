"""Metric learning (Siamese / triplet networks, face verification): the trainer, contrastive,
pair-BCE and triplet losses with batch-hard / batch-all mining, and verification metrics
(threshold, accuracy, ROC, k-NN) fitted on validation pairs."""
