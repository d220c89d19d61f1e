"""CycleGAN: two generators and two discriminators on unpaired domains, the history pool of fakes,
and the translate mode."""
