"""subtomo.postprocess"""
