"""Other ways in: the predecessor's REST API and the Bluesky device."""
