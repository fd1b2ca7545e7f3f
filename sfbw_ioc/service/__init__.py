"""Running the IOC: wiring of the threads, life cycle, watchdog."""
