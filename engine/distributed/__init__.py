"""Many processes: the world and its collectives (``collectives``) and joining and leaving the
process group for a run (``session``)."""
