"""Token and USD quotas per user and model family, with a hard cap that holds under concurrency.

Before a request goes upstream, its worst case (prompt tokens plus the most output it may produce, and those tokens
priced at the model's prices) is reserved against the user's quotas in one atomic step; afterwards the reservation
is replaced by what the upstream reported and what that cost, or released when the request failed. Fifty parallel
requests against a quota for five cannot pass more than five, and a failed request costs nothing.
"""

import asyncio
import json
import logging
import weakref
from collections.abc import Sequence
from datetime import datetime, timedelta

from mitmproxy import ctx, exceptions, http

from addons.apierrors import error_response, fail_closed, refuses_config_errors
from addons.flowstate import flow_state, forward_route, parsed_body
from addons.modelfamilies import ModelFamilies
from addons.settlement import settlement_listener
from llmproxy import scrub
from llmproxy.api.usage import Usage
from llmproxy.families import parse_family_numbers
from llmproxy.flowstate import BilledUsage, FlowState
from llmproxy.pricing import DEFAULT_PRICES, Price, parse_cost_quotas, parse_prices, price_of, usd
from llmproxy.quota import Reservation, next_refresh, output_reservation, over_quota_message, prompt_estimate
from llmproxy.store import StoreUnavailable
from llmproxy.store.storage import Storage
from llmproxy.usage_days import day_counter, utc_today

logger = logging.getLogger(__name__)

_STREAM_USAGE_ROUTES = ("openai.chat_completions", "openai.completions")
_LONGEST_WAIT = 60  # seconds between looks at the clock, so that a clock that jumped is noticed within a minute
_RETRY_AFTER = timedelta(minutes=1)  # after a failed refresh


class QuotaKeeper:
    """Reserves before dispatch, settles afterwards; also counts prompts, tokens and costs for the status page."""

    def __init__(self, storage: Storage, families: ModelFamilies, price_fallbacks: dict[str, str]):
        self.storage = storage
        self.families = families
        self.price_fallbacks = price_fallbacks  # service -> the MODEL_PRICES entry its unlisted models cost
        self.quotas: dict[str, int] = {}
        self.cost_quotas: dict[str, int] = {}  # nano-dollars by family, and "total"
        self.prices: list[tuple[str, Price]] = []
        self.schedule = ""  # the QUOTA_REFRESH_PERIOD, empty: quotas never start afresh
        self.clock = datetime.now  # local wall-clock time, which the schedule names; a test steps it
        self.reservations: weakref.WeakKeyDictionary[http.HTTPFlow, Reservation] = weakref.WeakKeyDictionary()
        self._task: asyncio.Task | None = None

    def load(self, loader):
        loader.add_option(
            "token_quotas",
            Sequence[str],
            [],
            "Tokens per user and family per quota period: family=tokens. TOKEN_QUOTA_<FAMILY> sets one too.",
        )
        loader.add_option(
            "cost_quotas",
            Sequence[str],
            [],
            "USD per user per quota period: family=usd for a family, total=usd for all families together.",
        )
        loader.add_option(
            "model_prices",
            Sequence[str],
            DEFAULT_PRICES,
            "USD per million tokens, model-pattern=input/output/cache read/cache write 5m/1h/web searches per 1,000.",
        )
        loader.add_option(
            "quota_refresh_period",
            str,
            "",
            "When quotas start afresh: hourly, daily, or a cron expression; empty: never.",
        )

    @refuses_config_errors
    def configure(self, updated):
        if "token_quotas" in updated:
            self.quotas = parse_family_numbers("token_quotas", ctx.options.token_quotas)
        if "cost_quotas" in updated:
            self.cost_quotas = parse_cost_quotas(ctx.options.cost_quotas, self.families.all_families())
        if "model_prices" in updated:
            self.prices = parse_prices(ctx.options.model_prices)
        if "quota_refresh_period" in updated:
            period = ctx.options.quota_refresh_period.strip()
            if period:
                try:
                    next_refresh(period, self.clock())
                except ValueError as error:
                    raise exceptions.OptionsError(
                        "QUOTA_REFRESH_PERIOD must be hourly, daily or a cron expression (minute hour day-of-month "
                        f"month day-of-week), not {period!r}: {error}."
                    ) from None
            self.schedule = period

    def running(self):
        if self.schedule:
            self._task = asyncio.create_task(self._refresh_on_schedule())

    def done(self):
        if self._task:
            self._task.cancel()

    async def _refresh_on_schedule(self) -> None:
        """Starts a new quota period at each time the schedule names. A failed refresh (the store unreachable, say)
        is logged and tried again a minute later, until it succeeds: the task must never end, or refreshes stop
        for good without a word."""
        due = next_refresh(self.schedule, self.clock())
        logger.info("quotas start afresh next at %s", f"{due:%Y-%m-%d %H:%M}")
        while True:
            await asyncio.sleep(min(max((due - self.clock()).total_seconds(), 0), _LONGEST_WAIT))
            if self.clock() < due:
                continue
            try:
                upcoming = next_refresh(self.schedule, self.clock())
                self.storage.store.reset_usage()
            except Exception as error:
                logger.error("quota refresh failed, trying again in a minute: %s", scrub.text(repr(error)))
                due = self.clock() + _RETRY_AFTER
                continue
            due = upcoming
            logger.info("quotas refreshed; next at %s", f"{due:%Y-%m-%d %H:%M}")

    def limit_for(self, user: dict, family: str) -> int | None:
        """The user's quota for the family (None: unlimited): their own limit, else the proxy's."""
        if user["type"] == "special":
            return None
        limit = user["token_limits"].get(family, self.quotas.get(family, 0))
        return limit or None

    def cost_limit_for(self, user: dict, family: str) -> int | None:
        """The user's USD quota in nano-dollars for the family, or for all families together if `family` is
        "total" (None: unlimited)."""
        if user["type"] == "special":
            return None
        return self.cost_quotas.get(family) or None

    def price_for(self, state: FlowState) -> Price:
        """The price of the request's model."""
        service = state.route.service
        return price_of(self.prices, service, state.model, state.family, self.price_fallbacks[service])

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if (route := forward_route(flow)) is None:
            return
        state = flow_state(flow)
        body = parsed_body(flow)
        if route.form in _STREAM_USAGE_ROUTES and body.get("stream") is True:
            options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            if options.get("include_usage") is not True:
                # Usage arrives only when asked for; the meter removes the extra chunk the client did not ask for.
                body["stream_options"] = {**options, "include_usage": True}
                flow.request.content = json.dumps(body).encode()
                state.usage_chunk_added = True
        if not (user_id := state.user) or route.counts_tokens:
            return
        store, user, family = self.storage.store, state.user_record, state.family  # the gatekeeper's read of the user
        limit, cost_limit, total_cost_limit = (
            self.limit_for(user, family),
            self.cost_limit_for(user, family),
            self.cost_limit_for(user, "total"),
        )
        estimate = state.prompt_tokens or prompt_estimate(body)
        output = output_reservation(body)
        tokens = estimate + output
        if limit is None and cost_limit is None and total_cost_limit is None:
            # Nothing to hold back, so nothing is set aside in the store (a round trip to a shared store saved); the
            # estimate still bounds what odd usage figures count, and the settlement bills.
            self.reservations[flow] = Reservation(user_id, family, tokens, estimate, 0, held=False)
            return
        cost = self.price_for(state).worst_case(estimate, output)
        if not store.reserve(user_id, family, tokens, limit, cost, cost_limit, total_cost_limit):
            state.decision = "over_quota"
            figures = store.get_user(user_id) or {"usage": {}}  # read only now: a request within quota needs none
            message = over_quota_message(figures, family, tokens, cost, limit, cost_limit, total_cost_limit)
            flow.response = error_response(route.dialect, 429, message, "quota_exceeded")
            return
        self.reservations[flow] = Reservation(user_id, family, tokens, estimate, cost)

    def prompt_estimate_of(self, flow: http.HTTPFlow) -> int:
        reservation = self.reservations.get(flow)
        return reservation.prompt_estimate if reservation else prompt_estimate(parsed_body(flow))

    def final_usage(self, flow: http.HTTPFlow, usage: Usage | None) -> tuple[Usage | None, int]:
        """What the request is billed (None: nothing was produced) and its cost in nano-dollars. A side of the bill
        with a figure that was no count counts at least as reserved."""
        if usage is None:
            return None, 0
        state = flow_state(flow)
        price = self.price_for(state)
        if usage.odd:
            prompt = self.prompt_estimate_of(flow)
            reservation = self.reservations.get(flow)
            output = reservation.tokens - prompt if reservation else output_reservation(parsed_body(flow))
            usage = usage.at_least(prompt, output, price.dearest_prompt_kind())
            logger.warning(
                "%s answered usage figures that are no count (%s) on %s; counted as reserved",
                state.route_name,
                ", ".join(sorted(usage.odd)),
                flow.id,
            )
        return usage, price.cost(usage)

    @settlement_listener
    def request_settled(self, flow: http.HTTPFlow, usage: Usage | None, cost: int, completion: str) -> None:
        """Bills the request: counted for the status page, and the user's reservation replaced by what it used."""
        state, store = flow_state(flow), self.storage.store
        reservation = self.reservations.pop(flow, None)
        family, counted = state.family, {}
        if usage is not None:
            state.usage = BilledUsage(usage.prompt, usage.output, usage.estimated, usd(cost))
            today = utc_today().isoformat()
            counted = {
                "prompts": 1,
                "tokens": usage.total,
                "cost_nanousd": cost,
                f"tokens:{family}": usage.total,
                f"cost_nanousd:{family}": cost,
                day_counter(today, "tokens", family): usage.total,
                day_counter(today, "cost_nanousd", family): cost,
                day_counter(today, "prompts", family): 1,
            }
        try:
            if reservation:  # the counters go with the settlement: one write
                spent = {**usage.counts(), "cost_nanousd": cost} if usage else None
                state.settlement = store.settle(
                    reservation.user,
                    reservation.family,
                    reservation.held_tokens,
                    usage.total if usage else 0,
                    reservation.cost,
                    spent,
                    counted,
                )
            elif counted:
                store.add_to_counters(**counted)
        except StoreUnavailable as error:
            # The reservation's lease runs out on its own: the request counts not at all rather than in part.
            logger.warning("usage of a request could not be settled: %s", error)
