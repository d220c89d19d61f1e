"""Semantic segmentation (U-Net, FCN, dilated CNN): the trainer with pixel accuracy / mIoU /
Dice and mask overlays, and the cross-entropy and Dice losses."""
