"""Where a site's images come from: synthetic hospital sites or a user's .npz file."""

from fedclinic.data.imageset import ImageSet

__all__ = ["ImageSet"]
