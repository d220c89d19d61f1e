"""Model families: one file each; configs/model/*.yaml name their constructors."""
