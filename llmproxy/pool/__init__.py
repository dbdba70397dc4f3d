"""The owner's keys and who gets them: the key pool, the wait queue and the key checker."""
