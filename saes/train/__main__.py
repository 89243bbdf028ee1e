"""`python -m saes.train`: `saes.train.loop.main`, host memory recycled on CPU as the loop's docstring says."""

from models import host_memory
from saes.train.loop import main

host_memory.recycle_freed_memory()
main()
