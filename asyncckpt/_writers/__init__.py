"""The writers: the FIFO that performs saves and removes off the training thread (a thread or a spawned process)."""
