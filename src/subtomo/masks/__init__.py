"""subtomo.masks"""
