"""The one boot sequence: restore a verified snapshot, else cold boot, warm up, snapshot, prove.

    sequence     the steps and the three ways they are put together (serve, create, restore)
    site         where the engine runs: HostSite, IsolatedSite (how to spawn, restore, reach)
    environment  the environment an engine is launched with; the plugin check
    create       `fastboot snapshot create`: the isolated snapshot replicas are restored from

Every caller (`fastboot serve` in both layouts, `fastboot snapshot create`, the agent) goes
through sequence; none keeps a copy of it.
"""
