"""torchserve"""
