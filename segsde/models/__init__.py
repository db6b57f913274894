"""Networks shared by every stage: ResNet encoder, ASPP + U-Net decoder, pose network, frozen feature copy."""
