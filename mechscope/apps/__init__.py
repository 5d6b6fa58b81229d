"""The applications: the command line, the main job and the first look. Nothing in the library imports them."""
