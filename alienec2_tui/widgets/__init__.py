"""The console's widgets: each renders data it is given; none speaks HTTP."""
