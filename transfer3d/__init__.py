"""Transfer learning for 3D medical imaging: supervised (dense, sparse, 2D->3D) pre-training, transfer, and annotation-savings studies on MONAI networks"""

__version__ = "0.1.0"
