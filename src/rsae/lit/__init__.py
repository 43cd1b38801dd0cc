from rsae.lit.module import SAEModule

__all__ = ["SAEModule"]
