"""The PyTorch data path: preprocessing, ground truth and data sets.

The synthetic world lives in `jsa_fast.data.synth` (not imported here, so that
`python -m jsa_fast.data.synth` runs it as a fresh module).
"""

from jsa_fast.data.audio import (
    AudioConfig,
    load_audio,
    log_spectrogram,
    mask_spectrogram,
    middle_clip,
    wav_to_spectrogram,
)
from jsa_fast.data.datasets import (
    AudioVisualDataset,
    BadFilesError,
    collate_skip_none,
    make_loader,
    read_id_list,
    read_vggss_json,
)
from jsa_fast.data.groundtruth import flickr_gt_map, load_mask, read_flickr_boxes, vggss_gt_map
from jsa_fast.data.image import (
    AUGMENTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageConfig,
    eval_transform,
    load_image,
    train_transform,
    video_frame_count,
    video_middle_frame,
)

__all__ = [
    "AUGMENTS",
    "AudioConfig",
    "AudioVisualDataset",
    "BadFilesError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageConfig",
    "collate_skip_none",
    "eval_transform",
    "flickr_gt_map",
    "load_audio",
    "load_image",
    "load_mask",
    "log_spectrogram",
    "make_loader",
    "mask_spectrogram",
    "middle_clip",
    "read_flickr_boxes",
    "read_id_list",
    "read_vggss_json",
    "train_transform",
    "vggss_gt_map",
    "video_frame_count",
    "video_middle_frame",
    "wav_to_spectrogram",
]
