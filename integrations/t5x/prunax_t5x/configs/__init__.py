"""Gin files; gin finds them by package path, e.g. prunax_t5x/configs/pruning.gin."""
