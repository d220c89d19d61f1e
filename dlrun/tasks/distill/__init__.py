"""Knowledge distillation: a student trained on a frozen teacher's softened logits (Hinton et al.),
built on the classification trainer, with its loss."""
