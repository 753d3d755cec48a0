"""A simulated fleet for the fleet benchmark (bench/fleet.py) and its small version in
`make test` (tests/integration/test_fleet_sim.py): N nodes, each with its own state
directory, small sparse disk and grubenv, running the REAL agent (`updater.agent.Agent`)
in a few worker processes, against one nginx serving a repository signed by
`sign-release` and a 3-member etcd cluster holding the reboot locks.

    fleet      the nodes and the repository on disk; the update with `--waves`
    nginx      the HTTP server and its access log (bytes and requests per node)
    worker     one process: its nodes' daemon cycles, simulated reboots (the slot from
               the model of the shipped GRUB script), health checks
    measure    the figures and invariants, from the agents' logs, nginx's log, journals
    run        the whole rollout: `simulate(work, Params(...)) -> report`

Only the hardware is simulated: the firmware's boot (GRUB's choice by
`tools.powercut.grubmodel`, after a fixed reboot time) and the scheduler that runs each
node's daemon cycle every poll interval (the daemon's own sleep). Everything an agent
decides and does is its own code.
"""
