"""Transfer learning for 3D medical imaging: supervised (dense, sparse, 2D->3D) pre-training, transfer, and annotation-savings studies on MONAI networks

Modules:

- `transfer3d.core`: The pieces every other module of transfer3d needs: typed params, seeding, device selection, atomic writes, and the project's errors."""

__version__ = "0.1.0"
