"""The guest SDK: a small C runtime, a two-VTL framework and a gcc build module.

``vsmtrace.guests.build`` compiles a guest's C/assembly sources with the runtime in
``runtime/`` into a Multiboot (or raw 64-bit) ELF kernel that ``vsmtrace run`` boots.
"""
