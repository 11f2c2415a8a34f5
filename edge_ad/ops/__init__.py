"""Running and watching the runtime: command line, config, statistics, status line, tools."""
