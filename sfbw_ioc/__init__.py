"""sfbw-ioc: the SwissFEL bsread buffer and writer as an EPICS soft IOC.

The data path reads down the folders:

    bsread/       the codec: bsread messages in and out (depends on nothing else here)
    stream/       socket -> ring: receiver, whole-message receive, ring buffer, memory,
                  re-publishing, the simulated source
    output/       where a file may go and who owns it: output root, .partial, ownership
    recorder/     EPICS PVs recorded into the files: the list, a CA or PVA monitor on
                  each, their recent history
    hdf5/         ring messages -> HDF5 file in the SwissFEL layout
    acquisition/  which messages go into which file: the plan (the decisions, pure), the
                  controller and its thread, its published status, channel selection,
                  file naming
    live/         sampling the newest messages for the live view
    pvs/          the caproto IOC: stream PVs, the writers' SubGroups, live view, the
                  db generator, access security
    bridges/      the predecessor's REST API, the Bluesky device
    group/        sfbw-group: many IOCs as one, the master file
    service/      wiring of the threads, watchdog
    vocabulary    the states and status every part shares
    cli           sfbw-ioc's command line

docs/architecture.md draws it.
"""

__version__ = "0.1.0"
