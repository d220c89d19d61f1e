"""The shared loop (`base.Trainer`) and one subclass per task."""
