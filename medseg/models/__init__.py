"""Networks: MONAI UNet, DynUNet, UNETR and SwinUNETR built from the run config."""

from medseg.models.factory import build_model, check_forward, dynunet_plan, model_defaults

__all__ = ["build_model", "check_forward", "dynunet_plan", "model_defaults"]
