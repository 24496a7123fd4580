"""Tools about the package's Triton kernels as a whole (the kernels live with their ops in ``ops/<op>/``):
``compile_check`` compiles every kernel ahead of time for a GPU architecture, ``sass_report`` reads what the
compiler made of it."""
