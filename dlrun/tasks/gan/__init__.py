"""GANs (the notes' GAN and DCGAN): the alternating discriminator / generator trainer, its sample
mode, and the GAN objectives (BCE, non-saturating, hinge, LSGAN, WGAN-GP)."""
