"""dicomnode: a DICOM node that classifies axial CT slices by anatomical region."""

__version__ = "0.1.0"
