"""Values and energy accounting, pure: no I/O, no clock, no threads."""
