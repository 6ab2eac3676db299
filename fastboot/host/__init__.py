"""Host plumbing: what fastboot does to this machine's processes, namespaces and network.

    proctree     /proc walks, killing whole trees, holding signals while a child starts
    launch       the command lines that start an engine in fresh pid (+ net, mount) namespaces
    iouring      the seccomp wrapper that keeps io_uring (which CRIU cannot dump) out of engines
    supervisor   EngineTree: one engine tree, spawned or adopted after a restore, always reaped
    shm          the /dev/shm files a host-layout engine shares with the host
    netns        network namespaces with a veth and a /30 each (replicas, isolated serve)
    relay        a TCP relay that publishes an engine in a namespace on the user's host/port
    cgroups      per-replica cgroup v2 limits

Imports only the core (fastboot.errors, envs, logs): everything above may use it.
"""
