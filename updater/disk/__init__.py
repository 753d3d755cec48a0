"""On-disk formats the agent edits to switch slots: GPT, GRUB environment block, layouts."""
