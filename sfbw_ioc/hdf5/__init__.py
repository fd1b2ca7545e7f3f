"""The HDF5 file in the SwissFEL layout, written from columns of ring messages."""
