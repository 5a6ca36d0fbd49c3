"""The process an attention or expert rank runs in: its device, its compute thread, host-sync
guards, staging buffers and the profiler's sections."""
