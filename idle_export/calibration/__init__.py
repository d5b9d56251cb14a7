"""Images for checks and INT8 calibration: timm's eval transform, readers, built-in photos."""
