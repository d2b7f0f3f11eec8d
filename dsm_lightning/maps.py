"""``python -m dsm_lightning.maps predict --model.checkpoint_path=<saliency.safetensors> --data.predict_dir=<images>
--writer.output_dir=<folder>``: one saliency PNG per image from a DSM-merged backbone (see
:class:`~dsm_lightning.cli.MapsCLI`)."""

from __future__ import annotations

from .cli import maps_main

if __name__ == "__main__":
    maps_main()
