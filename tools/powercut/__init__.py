"""Power cuts at every write: record a node's disk writes in QEMU, replay the disk as a
power cut at any point would leave it, judge every replayed disk, boot a sample.

    writelog   the dm-log-writes format of QEMU's blklogwrites driver: read, apply
    replay     cuts as data (durable prefix + a subset of the writes after the last
               flush, torn at sector boundaries), planned from the logs, seeded;
               `Replayer` builds each cut's disk from a sparse working copy
    fat        a minimal FAT reader that finds a file as GRUB and the firmware do
    grubmodel  GRUB's `load_env` and the shipped A/B script's choice, as pure functions;
               the gptprio chooser's rule
    judge      one replayed disk on the host: GPT, bootloader, grubenv, the slot the boot
               chain would start and its image, the agent's journal
    record     the update cycles, recorded with tools.node (one QEMU process per boot)
    campaign   all of it, plus booting a seeded sample with real GRUB; `make powercut`

docs/powercut.md describes the model, the campaign and what it found.
"""
