python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD LIGHTNING_VIGU_CACHE=/tmp/q/cache LIGHTNING_VIGU_COMMIT=$1 PYTHONUNBUFFERED=1
W="--data=conf/data/synthetic_gpu.yaml --data.init_args.preset=cpu --data.init_args.num_workers=3 --data.init_args.batch_size=256 --model.video_shape=[16,32,32] --model.lr=1e-3"
date
timeout 300 python -m benchmarks.cli_loop --before .devcarry/d1ccd57 .devcarry/fbbb4cd --before-label d1ccd57 fbbb4cd --loops before now --config conf/generator.yaml --steps 245 --timed 60 240 --num-train 20000 --shared-cache --work /tmp/clA --out $OUT --tag _twin_h200 --extra $W 2>&1 | grep -v "^\[" | tail -12
date
mkdir -p /tmp/clB && ln -sfn /tmp/clA/cache-shared /tmp/clB/cache-shared
timeout 200 python -m benchmarks.cli_loop --before .devcarry/fbbb4cd --before-label fbbb4cd --loops before now --config conf/recall.yaml --steps 245 --timed 60 240 --num-train 20000 --shared-cache --work /tmp/clB --out $OUT --tag _recall_h200 --extra $W --model.caption_objective=autoregressive --init_from=null 2>&1 | tail -8
date
grep -l "Traceback" /tmp/clA/*.log /tmp/clB/*.log && for f in /tmp/clA/*.log /tmp/clB/*.log; do echo $f; tail -n 6 $f; done
ls $OUT
